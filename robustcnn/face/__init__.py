"""The physical-patch feature on face recognition: the gallery and its crops, patch masks, physical
transforms (EOT), printability, the patch optimiser, the study over attackers x targets, its plots;
and what a face study job builds on: its settings (the ``face`` section), enrolment, threshold
calibration and artifacts.

The recognizer networks themselves (ports of pretrained models and their checksummed asset fetchers)
are models: :mod:`robustcnn.models.face`.
"""
