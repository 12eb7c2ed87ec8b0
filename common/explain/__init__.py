"""Explaining a prediction: where in the slide the model looked, and what it found there.

From a model's per-patch scores (its pooling weights, :class:`~common.models.base.
InstanceScorer`): :mod:`~common.explain.segment` (rank-normalised scores, the weakly
supervised tumour mask, Dice and IoU against an annotation), :mod:`~common.explain.heatmap`
(the scores over the slide's thumbnail, with a colour bar, and the top patches) and
:mod:`~common.explain.geojson` (QuPath's GeoJSON: one tile per patch, merged tumour
annotations). ``pathfed predict`` (:mod:`common.predict`) writes them all.
"""
