from diffdissect.cli import main

raise SystemExit(main())
