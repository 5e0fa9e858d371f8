"""``torch-coherence thresholds``: the stability report for given sharpness, sigma, lr, B, n."""

from __future__ import annotations

import argparse

from ..theory import stability_report

__all__ = ["add_thresholds"]


def _run_thresholds(args: argparse.Namespace) -> int:
    rep = stability_report(
        args.sharpness,
        args.sigma,
        args.lr,
        args.batch_size,
        args.n,
        momentum=args.momentum,
        sam_rho=args.sam_rho,
        sam_alpha=args.sam_alpha,
        lambda_min=args.lambda_min,
    )
    rows = [
        ("sharpness lambda_1(H)", rep.sharpness),
        ("coherence sigma", rep.sigma),
        ("GD threshold", rep.gd_threshold),
        ("Theorem 1 threshold", rep.theorem1_threshold),
        ("Theorem 2 bound", rep.theorem2_bound),
    ]
    if rep.sam_threshold is not None:
        rows.append(("SAM threshold (C.8)", rep.sam_threshold))
    rows += [
        ("margin", rep.margin),
        ("critical learning rate", rep.critical_lr),
        ("critical batch size", rep.critical_batch_size),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:.6g}")
    print(f"{'regime':<{width}}  {rep.regime}")
    print()
    print(rep.explain())
    return 2 if rep.unstable and args.fail_if_unstable else 0


def add_thresholds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "thresholds",
        help="stability thresholds and margins for given sharpness, sigma, lr, B, n",
        description="Print the stability report (paper 000 Theorems 1-2, paper 002 C.8).",
    )
    p.add_argument("--sharpness", type=float, required=True, help="lambda_1 of the mean Hessian")
    p.add_argument("--sigma", type=float, required=True, help="coherence measure (>= 1)")
    p.add_argument("--lr", type=float, required=True, help="learning rate eta")
    p.add_argument("--batch-size", type=float, required=True, help="batch size B in [1, n]")
    p.add_argument("--n", type=int, required=True, help="data-set size")
    p.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum in [0, 1)")
    p.add_argument("--sam-rho", type=float, default=None, help="SAM radius rho (SAM if given)")
    p.add_argument("--sam-alpha", type=float, default=1.0, help="SAM normaliser alpha")
    p.add_argument("--lambda-min", type=float, default=0.0, help="lambda_min(H) for SAM")
    p.add_argument(
        "--fail-if-unstable", action="store_true", help="exit with status 2 when unstable"
    )
    p.set_defaults(func=_run_thresholds)
