from vqkit.cli import main

raise SystemExit(main())
