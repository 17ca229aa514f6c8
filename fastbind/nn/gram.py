class GramLoss: ...  # scaffold, replaced by the GRAM owner
