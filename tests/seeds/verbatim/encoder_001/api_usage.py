import requests

# Single text classification
response = requests.post("http://localhost:8000/predict", json={
    "texts": "This is a sample text to classify"
})
result = response.json()

# Batch text classification
response = requests.post("http://localhost:8000/predict", json={
    "texts": ["Text 1", "Text 2", "Text 3"]
})
results = response.json()

# With specific model (if multiple loaded)
response = requests.post("http://localhost:8000/predict", json={
    "texts": "Sample text",
    "model_name": "wandb/WeaveFluencyScorerV1"
})
