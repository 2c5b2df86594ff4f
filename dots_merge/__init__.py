"""dots-merge: DoTS merging of SFT and RLVR fine-tunes, as a mergekit method plus the tools around it.

Importing the package registers the `dots` merge method with mergekit.
"""

from dots_merge.merge.method import register as _register
from dots_merge.version import __version__

_register()

from dots_merge.merge.driver import MergeResult, merge  # noqa: E402

__all__ = ["MergeResult", "__version__", "merge"]
