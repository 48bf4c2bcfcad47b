"""
Where sentry_tx's source tree is, for the processes tests start (trial
runs in a temporary directory, so they need it on their PYTHONPATH).
"""

import os


PROJECT_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
"""
The top of the source tree (where C{sentry_tx/} and C{twisted/plugins/}
are): processes that tests start put it on their PYTHONPATH, since trial
runs in a temporary directory.
"""
