from keruta_prefect.agent.cli import main

raise SystemExit(main())
