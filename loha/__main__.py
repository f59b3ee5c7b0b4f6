"""`python -m loha …`: see loha.app.cli."""

from .app.cli import main

raise SystemExit(main())
