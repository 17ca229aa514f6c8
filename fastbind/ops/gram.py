# scaffold: replaced by the gram family implementation
def gram_volume(*a, **k): raise NotImplementedError
def gram_volume_paired(*a, **k): raise NotImplementedError
def gram_loss(*a, **k): raise NotImplementedError
