"""What each token of a packed batch is trained with; shared by the data path and the loss."""
from enum import IntEnum


class TokenKind(IntEnum):
    IGNORE = 0        # prompt, tool observation, padding: no loss
    RL = 1            # sampled by the policy: clipped policy-gradient surrogate (+ KL, entropy)
    SFT = 2           # expert / gold token: weighted negative log-likelihood
    UNLIKELIHOOD = 3  # erroneous token: weighted -log(1 - p)
