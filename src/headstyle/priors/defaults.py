"""The models a run uses when none are named: the LD script's SD 1.5 checkpoint, VAE and ControlNets (hub ids)."""

DEFAULT_MODEL = "SG161222/Realistic_Vision_V5.1_noVAE"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_CONTROLNETS = {"canny": "lllyasviel/sd-controlnet-canny", "depth": "lllyasviel/sd-controlnet-depth"}
