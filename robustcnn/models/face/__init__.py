"""Face recognition: a real pretrained embedder (face-api's ResNet, ported to torch) and the
verification / identification rules that patch attacks are judged by."""
