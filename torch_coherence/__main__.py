"""``python -m torch_coherence`` runs the command-line interface."""

from .cli import main

raise SystemExit(main())
