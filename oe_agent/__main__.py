from oe_agent.cli import main

raise SystemExit(main())
