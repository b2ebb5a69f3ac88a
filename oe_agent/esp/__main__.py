"""`python -m oe_agent.esp CONFIG.json`: the userspace dataplane with static keys (static.py)."""
import sys

from oe_agent.esp.static import main

sys.exit(main())
