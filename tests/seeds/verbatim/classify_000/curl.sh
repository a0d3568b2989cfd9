# Option C: Direct curl
curl -X POST http://localhost:8000/classify \
  -H "Content-Type: application/json" \
  -d '{"texts": ["Test text"], "capabilities": ["classification"]}'
