"""The parts of `scripts/convert_image_mixer.py`: an ldm (CompVis) ImageMixer checkpoint read without running code
from it ([`checkpoint`]), its yaml turned into diffusers configurations ([`ldm_configs`]) and its weights renamed for
them ([`state_dicts`]). `python scripts/convert_image_mixer.py` has this folder's parent first on `sys.path`, so the
script imports them as `image_mixer.<part>`."""
