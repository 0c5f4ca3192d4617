"""Sampling math, numpy only: the float64 schedule (`schedule`), the sampler names and option rules (`spec`), the
reverse step as an affine row (`step`), the plans of DDPM/DDIM (`plan`) and the multistep solvers (`multistep`),
per-image step noise (`noise`) and the variational bound (`likelihood`)."""
