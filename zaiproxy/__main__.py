from zaiproxy.cli import main

raise SystemExit(main())
