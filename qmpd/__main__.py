from qmpd.cli import main

raise SystemExit(main())
