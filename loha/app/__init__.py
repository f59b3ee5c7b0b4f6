"""What users run: the command line (`cli`), the Gradio tabs (`ui`, `ui_train`), the demo.

`specs` parses the ``FILE[:UNET[:TE]]`` notation the command line and the tabs share.
"""
