class CentroBindLoss: ...  # scaffold


class InfoNCELoss: ...  # scaffold
