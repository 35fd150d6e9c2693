"""The one training loop (:mod:`.loop`) and the checksummed weight cache (:mod:`.cache`).

Defenses hook into the loop (adversarial examples, penalties) rather than writing their own; which
model a job gets (cached, else built, defended and trained) is decided above defenses, in
:mod:`robustcnn.jobs.trained`.
"""
