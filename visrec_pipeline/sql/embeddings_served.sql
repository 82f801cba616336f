-- Feature rows a reader may use for $backbone: current weights, image still ok and unchanged; rows
-- brought with the dataset (content hash 'byo:<files hash>') are served without an image.
SELECT e.item_id, e.weights_tag, e.shard, e."row"
FROM embedding_index e
JOIN embedding_provenance p ON p.backbone = e.backbone AND p.weights_tag = e.weights_tag
LEFT JOIN item_images i ON i.item_id = e.item_id
WHERE e.backbone = $backbone
  AND (starts_with(e.content_hash, 'byo:') OR (i.status = 'ok' AND i.content_hash = e.content_hash))
ORDER BY e.item_id
