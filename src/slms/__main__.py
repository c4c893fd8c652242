from slms.cli import main

raise SystemExit(main())
