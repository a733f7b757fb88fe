"""The fine-tuned model in a web page, run by onnxruntime-web in the visitor's browser.

- static/: the page (plain ES modules: the bundle's files checked against its manifest, the .onnx_adapter reader,
  prompts and tokenizer, the generation loop, the chat UI); package.json / package-lock.json pin what it imports;
- site.py: the page's files (its own, its packages, the bundle files it reads), served or written as a site;
- browser.py: headless chromium for the page's tests and benchmark.

May import: ``bundle``, ``errors``.
"""
