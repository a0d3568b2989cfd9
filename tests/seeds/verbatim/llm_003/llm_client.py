import requests
import json

class LLMClient:
    def __init__(self, base_url="http://localhost:8000"):
        self.base_url = base_url
        self.session = requests.Session()
    
    def generate(self, prompt, **kwargs):
        """Generate text using the API."""
        response = self.session.post(
            f"{self.base_url}/generate",
            json={"prompt": prompt, **kwargs}
        )
        response.raise_for_status()
        return response.json()
    
    def chat(self, messages, **kwargs):
        """Chat using the API."""
        response = self.session.post(
            f"{self.base_url}/chat",
            json={"messages": messages, **kwargs}
        )
        response.raise_for_status()
        return response.json()
    
    def stream_generate(self, prompt, **kwargs):
        """Stream text generation."""
        response = self.session.post(
            f"{self.base_url}/generate",
            json={"prompt": prompt, "stream": True, **kwargs},
            stream=True
        )
        response.raise_for_status()
        
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
                yield data

# Usage
client = LLMClient()

# Simple generation
result = client.generate(
    prompt="Explain artificial intelligence",
    max_tokens=512,
    temperature=0.7
)
print(result["text"])

# Streaming generation
for chunk in client.stream_generate(
    prompt="Write a story about a robot",
    max_tokens=1024,
    temperature=0.8
):
    if "text" in chunk:
        print(chunk["text"], end="", flush=True)
