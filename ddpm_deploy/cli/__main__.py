"""`python -m ddpm_deploy.cli`: the same as the `ddpm-deploy` command."""

from . import main

main()
