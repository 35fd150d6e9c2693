"""What one ``robustcnn run`` / ``robustcnn audit`` job does, from a validated config to results on disk
and in MLflow: the lifecycle every job kind shares, then the classifier, face and audit jobs as peers,
and the dispatcher that picks one (:mod:`.dispatch`)."""
