"""
The test suite. Hypothesis runs under one profile: no per-example deadline and
no "input generation is slow" health check, since both measure the machine
(a shared two-core box under CI, with mariadbd and redis-server beside the
tests), not the code.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("imserver", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("imserver")
