-- Feature rows a reader may use for $backbone: current weights, image still ok and unchanged.
SELECT e.item_id, e.weights_tag, e.shard, e."row"
FROM embedding_index e
JOIN embedding_provenance p ON p.backbone = e.backbone AND p.weights_tag = e.weights_tag
JOIN item_images i ON i.item_id = e.item_id AND i.status = 'ok' AND i.content_hash = e.content_hash
WHERE e.backbone = $backbone
ORDER BY e.item_id
