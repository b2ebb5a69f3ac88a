"""`python -m oe_agent.trap`: what this namespace's kernel can do for ESP (the probe)."""
import asyncio

from oe_agent.trap.dataplane import run_probe

caps = asyncio.run(run_probe())
print(f"esp={'yes' if caps.esp else 'no'} "
      f"algorithms={','.join(sorted(caps.algorithms)) or '-'} ({caps.detail})")
