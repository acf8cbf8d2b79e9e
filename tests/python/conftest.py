import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test dependency of the state-machine tests only
    pass
else:
    # default: deterministic and bounded (no example database, no deadline on a shared
    # machine); long: randomized, for runs on demand. TQ_HYPOTHESIS_PROFILE selects one.
    settings.register_profile("default", derandomize=True, database=None, deadline=None,
                              print_blob=True)
    settings.register_profile("long", derandomize=False, database=None, deadline=None,
                              print_blob=True)
    settings.load_profile(os.environ.get("TQ_HYPOTHESIS_PROFILE", "default"))
