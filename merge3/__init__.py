"""merge3: evolutionary model-merge search with cheap, IRT-estimated fitness.

>>> import merge3
>>> sorted(merge3.__all__)[:3]
['CandidateResult', 'Merge3Error', 'SearchOutcome']
"""

__version__ = "0.1.0"

from merge3._errors import Merge3Error  # noqa: E402
from merge3._api import SearchOutcome, export, resume, search, verify  # noqa: E402
from merge3.runs import leaderboard, write_report  # noqa: E402
from merge3.runtime import CandidateResult  # noqa: E402
from merge3.search import SearchSpace, load_space  # noqa: E402

__all__ = ["CandidateResult", "Merge3Error", "SearchOutcome", "SearchSpace", "__version__", "export", "leaderboard",
           "load_space", "resume", "search", "verify", "write_report"]
