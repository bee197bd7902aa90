"""Start the medchat app: chat with the base model and every fine-tuned run in ./runs.

    python launch.py [--help]             # http://127.0.0.1:7860; options as `medchat app`

Also a Hugging Face Space's app_file; the start-up itself is medchat.server.
"""

from medchat.server import main

if __name__ == "__main__":
    raise SystemExit(main())
