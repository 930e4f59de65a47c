from keruta_prefect.cli import main

raise SystemExit(main())
