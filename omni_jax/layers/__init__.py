"""Building blocks shared by every model part: parameters with logical axes, norms, linear layers, RoPE, attention."""
