"""Stand-ins for the parts of ComfyUI the pack uses, put into sys.modules.

They behave like ComfyUI 0.3.x: ``ProgressBar.update_absolute`` calls the
global hook, which raises ``InterruptProcessingException`` after Cancel;
``PromptServer.instance.send_progress_text`` records what it was sent;
``latent_preview.get_previewer`` returns a previewer (recording the latents it
is given) unless ``preview_method`` is "none", as ComfyUI's ``--preview-method``.
"""

import sys
import types


class ComfyStubs:
    def __init__(self):
        self.progress: list[tuple[int, int]] = []
        self.texts: list[tuple[str, str]] = []
        self.unloads = 0
        self.interrupt_at_step = None  # Cancel when the progress bar reaches this step
        self.previews: list = []  # the preview each progress update carried (None: none)
        self.previewed_latents: list = []  # what the previewer was asked to draw
        self.preview_method = "auto"

        model_management = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        model_management.InterruptProcessingException = InterruptProcessingException
        model_management.interrupt_processing = False

        def throw_exception_if_processing_interrupted():
            if model_management.interrupt_processing:
                model_management.interrupt_processing = False
                raise InterruptProcessingException()

        def unload_all_models():
            self.unloads += 1

        model_management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        model_management.unload_all_models = unload_all_models

        utils = types.ModuleType("comfy.utils")
        stubs = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current = total, 0

            def update_absolute(self, value, total=None, preview=None):
                self.current, self.total = value, total or self.total
                stubs.progress.append((value, self.total))
                stubs.previews.append(preview)
                if stubs.interrupt_at_step == value:  # the user pressed Cancel during this step
                    model_management.interrupt_processing = True
                model_management.throw_exception_if_processing_interrupted()  # as main.py's hook does

        utils.ProgressBar = ProgressBar

        latent_formats = types.ModuleType("comfy.latent_formats")

        class Wan21:
            latent_channels = 16

        class Wan22:
            latent_channels = 48

        latent_formats.Wan21, latent_formats.Wan22 = Wan21, Wan22

        latent_preview = types.ModuleType("latent_preview")

        class Previewer:
            def __init__(self, latent_format):
                self.latent_format = latent_format

            def decode_latent_to_preview_image(self, preview_format, x0):
                assert x0.shape[1] == self.latent_format.latent_channels
                stubs.previewed_latents.append(x0)
                return ("JPEG", f"preview {len(stubs.previewed_latents)}", 512)

        def get_previewer(device, latent_format):
            return None if stubs.preview_method == "none" else Previewer(latent_format)

        latent_preview.get_previewer = get_previewer

        comfy = types.ModuleType("comfy")
        comfy.utils, comfy.model_management, comfy.latent_formats = utils, model_management, latent_formats

        server = types.ModuleType("server")

        class PromptServer:
            instance = None

            def send_progress_text(self, text, node_id, sid=None):
                stubs.texts.append((text, node_id))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer
        self.modules = {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": model_management,
                        "comfy.latent_formats": latent_formats, "latent_preview": latent_preview, "server": server}
        self.model_management = model_management

    def install(self, monkeypatch):
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self
