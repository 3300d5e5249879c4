"""Facts about the original pack's node interface (yangwhale/gpu-tpu-pedia,
tpu/ComfyUI/custom_nodes/ComfyUI-Wan2.1-TPU: nodes.py and
examples/wan21_t2v_720p.json), recorded as data.

Saved UI workflows match widget values to widgets by position; API prompts
match inputs by name. So these names, their order, the required/optional
split and the outputs are an interface this pack must keep.
"""

# Per node: input names in INPUT_TYPES order, split as the original splits them.
ORIGINAL_INPUTS = {
    "Wan21TextEncoder": {
        "required": ["prompt", "negative_prompt"],
        "optional": ["model_id"],
    },
    "Wan21TPUSampler": {
        "required": ["prompt_embeds", "negative_prompt_embeds", "height", "width", "num_frames",
                     "num_inference_steps", "guidance_scale", "seed"],
        "optional": ["model_id", "flow_shift"],
    },
    "Wan21TPUVAEDecoder": {
        "required": ["latents"],
        "optional": ["model_id", "fps"],
    },
    "Wan21TPUPipeline": {
        "required": ["prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                     "guidance_scale", "seed"],
        "optional": ["model_id", "fps", "flow_shift"],
    },
}

ORIGINAL_OUTPUTS = {
    "Wan21TextEncoder": (("TENSOR", "TENSOR"), ("prompt_embeds", "negative_prompt_embeds")),
    "Wan21TPUSampler": (("LATENT", "INT"), ("latents", "num_frames")),
    "Wan21TPUVAEDecoder": (("IMAGE", "INT"), ("frames", "fps")),
    "Wan21TPUPipeline": (("IMAGE", "INT"), ("frames", "fps")),
}

# The original's ranges for numeric widgets: a value saved with it must validate here.
ORIGINAL_RANGES = {
    "height": (256, 1280), "width": (256, 1280), "num_frames": (17, 121), "num_inference_steps": (1, 100),
    "guidance_scale": (0.0, 20.0), "seed": (0, 2**32 - 1), "flow_shift": (1.0, 10.0), "fps": (1, 60),
}

# examples/wan21_t2v_720p.json of the original: each node's widgets_values, in
# the order the ComfyUI frontend saved them ("fixed" is the seed's
# control_after_generate widget, which the frontend adds to every "seed").
ORIGINAL_EXAMPLE_WIDGETS = {
    "Wan21TextEncoder": [
        "A cat and a dog baking a cake together in a kitchen. The cat is carefully measuring flour, while the dog is "
        "stirring the batter with a wooden spoon. The kitchen is cozy, with sunlight streaming through the window.",
        "Bright tones, overexposed, static, blurred details, subtitles, low quality, ugly, deformed",
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ],
    "Wan21TPUSampler": [720, 1280, 81, 50, 5, 42, "fixed", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 5],
    "Wan21TPUVAEDecoder": ["Wan-AI/Wan2.1-T2V-14B-Diffusers", 16],
}
# Its links: Text Encoder outputs 0, 1 -> Sampler inputs 0, 1; Sampler output 0
# (LATENT) -> Decoder input 0; Decoder output 0 (IMAGE) -> CreateVideo -> SaveVideo.
