"""Stand-ins for the parts of ComfyUI the pack uses, put into sys.modules.

They behave like ComfyUI 0.3.x: ``ProgressBar.update_absolute`` calls the
global hook, which raises ``InterruptProcessingException`` after Cancel;
``PromptServer.instance.send_progress_text`` records what it was sent.
"""

import sys
import types


class ComfyStubs:
    def __init__(self):
        self.progress: list[tuple[int, int]] = []
        self.texts: list[tuple[str, str]] = []
        self.unloads = 0
        self.interrupt_at_step = None  # Cancel when the progress bar reaches this step

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
                if stubs.interrupt_at_step == value:  # the user pressed Cancel during this step
                    model_management.interrupt_processing = True
                model_management.throw_exception_if_processing_interrupted()  # as main.py's hook does

        utils.ProgressBar = ProgressBar

        comfy = types.ModuleType("comfy")
        comfy.utils, comfy.model_management = utils, model_management

        server = types.ModuleType("server")

        class PromptServer:
            instance = None

            def send_progress_text(self, text, node_id, sid=None):
                stubs.texts.append((text, node_id))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer
        self.modules = {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": model_management,
                        "server": server}
        self.model_management = model_management

    def install(self, monkeypatch):
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self
