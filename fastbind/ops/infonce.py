# scaffold: replaced by the infonce family implementation
def infonce(*a, **k): raise NotImplementedError
def anchor_loss(*a, **k): raise NotImplementedError
def centroid_loss(*a, **k): raise NotImplementedError
def centroid_similarity(*a, **k): raise NotImplementedError
