"""`python -m loha …`: see loha.cli."""

from .cli import main

raise SystemExit(main())
