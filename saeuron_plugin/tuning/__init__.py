"""Tuning the ablation of a bundle's concepts with a judge (issue #19; in progress).

Built so far: judges as plug-ins (:mod:`.judges`). The search itself still lives in
``saeuron_plugin.eval.shapescanvas_build`` (ShapesCanvas only) until it moves here.
"""

from .judges import CallableJudge, ClipZeroShotJudge, Judge, JudgeLoadError, load_judge

__all__ = ["CallableJudge", "ClipZeroShotJudge", "Judge", "JudgeLoadError", "load_judge"]
