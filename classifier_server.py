"""`python classifier_server.py --config topics.json --gpu-list 0,1,2,3`: document 000's command line.

The same server as `python server.py` (every flag of it works here); the name is the document's, so
its command lines and Dockerfile CMD run unchanged. A `topics.json` whose `model` is a model
directory serves that LLM with nothing else on the command line.
"""

from __future__ import annotations

from server import main

if __name__ == "__main__":
    main()
