"""``python -m megavlm`` (and ``torchrun -m megavlm``) run the CLI."""

from megavlm.cli import main

raise SystemExit(main())
