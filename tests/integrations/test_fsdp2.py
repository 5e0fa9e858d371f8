"""FSDP2 (``fully_shard``) on 2 gloo CPU processes: the Gram's terms split over ranks.

The training run with the sharded probe must leave the weights bit-identical to the run
without it, both ranks must report the same numbers, the ranks must have split the work, and
the numbers must equal the single-process engine on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_coherence import measure_curvature
from torch_coherence.integrations.distributed import deal_terms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fsdp2_fit import N_TRAIN, PROBE_SIZE, build_model, data  # noqa: E402


@pytest.mark.ddp
def test_fsdp2_sharded_probe(tmp_path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "fsdp2_fit.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probed = torch.load(tmp_path / "weights_probed.pt")
    plain = torch.load(tmp_path / "weights_plain.pt")
    assert probed.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(value, probed[key]), key  # training unaffected, bit for bit

    h0 = json.loads((tmp_path / "history_0.json").read_text())
    h1 = json.loads((tmp_path / "history_1.json").read_text())
    assert [h["step"] for h in h0] == [3, 6]
    assert h0 == h1  # every rank derived the same numbers from the same summed Gram
    terms = h0[-1]["terms"]
    assert all(terms) and sorted(i for t in terms for i in t) == [0, 1, 2]  # split, no overlap
    g0 = torch.load(tmp_path / "gram_0.pt")
    assert torch.equal(g0, torch.load(tmp_path / "gram_1.pt"))

    # The single-process engine on the weights the last probe saw.
    model = build_model()
    model.load_state_dict(torch.load(tmp_path / "probe_weights.pt"))
    x, y = data()
    ref = measure_curvature(
        model,
        x[:PROBE_SIZE],
        y[:PROBE_SIZE],
        nn.CrossEntropyLoss(),
        n=N_TRAIN,
        sharpness="ggn",
        return_gram=True,
    )
    last = h0[-1]
    expected = {
        "sigma": ref.stats.sigma,
        "lambda_S": ref.stats.lambda_S,
        "max_sample_sharpness": ref.stats.max_sample_sharpness,
        "ggn_sharpness": ref.ggn_sharpness,
        "sigma_full": ref.sigma_full,
    }
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, rel=1e-6), key
    assert torch.allclose(g0, ref.gram.to(g0.dtype).reshape(g0.shape), rtol=1e-6, atol=1e-12)


def test_deal_terms_balances_and_is_deterministic() -> None:
    assert deal_terms([5.0, 1.0, 1.0, 3.0], 2) == [[0], [1, 2, 3]]
    assert deal_terms([1.0, 1.0], 3) == [[0], [1], []]
    assert deal_terms([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        deal_terms([1.0], 0)


@pytest.fixture
def one_rank(tmp_path):
    """A real 1-process gloo group (file store), destroyed afterwards."""
    import torch.distributed as dist

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_equals_the_engine_and_restores_the_model(one_rank) -> None:
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = build_model()
    x, y = data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = measure_curvature_sharded(model, x[:PROBE_SIZE], y[:PROBE_SIZE], nn.CrossEntropyLoss())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(p.requires_grad for p in model.parameters())
    ref = measure_curvature(
        model, x[:PROBE_SIZE], y[:PROBE_SIZE], nn.CrossEntropyLoss(), sharpness="ggn"
    )
    assert res.terms == ((0, 1, 2),)
    assert res.stats.sigma == pytest.approx(ref.stats.sigma, rel=1e-12)
    assert res.ggn_sharpness == pytest.approx(ref.ggn_sharpness, rel=1e-12)
    assert res.sigma_full is None and res.n == PROBE_SIZE


def test_uncovered_layers_are_refused(one_rank) -> None:
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = nn.Sequential(nn.Linear(6, 4), nn.PReLU(4), nn.Linear(4, 3))  # no rule for PReLU
    x, y = data()
    with pytest.raises(ValueError, match=r"\['1.weight'\].*layer rules cover"):
        measure_curvature_sharded(model, x[:4], y[:4], nn.CrossEntropyLoss())
    res = measure_curvature_sharded(
        model, x[:4], y[:4], nn.CrossEntropyLoss(), params=["0.weight", "2.weight", "2.bias"]
    )
    ref = measure_curvature(
        model,
        x[:4],
        y[:4],
        nn.CrossEntropyLoss(),
        params=["0.weight", "2.weight", "2.bias"],
        sharpness=None,
    )
    assert res.stats.sigma == pytest.approx(ref.stats.sigma, rel=1e-12)
    with pytest.raises(ValueError, match="not parameter names"):
        measure_curvature_sharded(model, x[:4], y[:4], nn.CrossEntropyLoss(), params=["nope"])


def test_layers_the_registry_covers_are_split_too(one_rank) -> None:
    """A LayerNorm (materialised rows of the norm rule) is a term like a ghost layer."""
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x, y = data()
    res = measure_curvature_sharded(model, x[:5], y[:5], nn.CrossEntropyLoss())
    ref = measure_curvature(
        model, x[:5], y[:5], nn.CrossEntropyLoss(), sharpness="ggn", return_gram=True
    )
    assert sorted(i for t in res.terms for i in t) == [0, 1, 2]
    assert res.stats.sigma == pytest.approx(ref.stats.sigma, rel=1e-12)
    assert res.ggn_sharpness == pytest.approx(ref.ggn_sharpness, rel=1e-12)
    # report.gram of a float32 model is stored in float32 (its entries carry that rounding)
    rtol = 1e-10 if ref.gram.dtype == torch.float64 else 1e-6
    assert torch.allclose(res.gram, ref.gram.to(res.gram.dtype).reshape(res.gram.shape), rtol=rtol)


def test_sharded_probe_needs_a_process_group() -> None:
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = build_model()
    x, y = data()
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        measure_curvature_sharded(model, x[:4], y[:4], nn.CrossEntropyLoss())


def test_one_rank_gram_has_the_engine_dtype_and_feeds_the_dynamics(one_rank) -> None:
    """The summed Gram of a float32 model carries float32 rounding: typed float32 like the
    engine's, so the dynamics check it at that tolerance (typed float64 they refuse it as
    indefinite: CE's Gram is rank deficient, its zero eigenvalues come out slightly negative)."""
    from torch_coherence.dynamics.curvature_space import as_coefficient_curvature
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = build_model()
    x, y = data()
    res = measure_curvature_sharded(model, x[:PROBE_SIZE], y[:PROBE_SIZE], nn.CrossEntropyLoss())
    ref = measure_curvature(
        model, x[:PROBE_SIZE], y[:PROBE_SIZE], nn.CrossEntropyLoss(), return_gram=True
    )
    assert res.gram.dtype == ref.gram.dtype == torch.float32
    assert torch.allclose(res.gram, ref.gram, rtol=0, atol=1e-6 * float(ref.gram.abs().max()))
    cc = as_coefficient_curvature(res.gram, "gram")
    assert cc.rank == as_coefficient_curvature(ref.gram, "gram").rank
