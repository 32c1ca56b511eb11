from personalize.cli import main

raise SystemExit(main())
