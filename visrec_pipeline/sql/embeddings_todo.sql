-- Images that need features for $backbone under $weights_tag: new, changed (content hash differs),
-- computed with other weights, or whose shard is gone or damaged ($missing_shards), or computed
-- before the backbone's current feature $revision (a fix that changed what its features hold).
SELECT i.item_id, i.content_hash, i.path
FROM item_images i
LEFT JOIN embedding_index e ON e.backbone = $backbone AND e.item_id = i.item_id
WHERE i.status = 'ok'
  AND (
      e.item_id IS NULL
      OR e.content_hash IS DISTINCT FROM i.content_hash
      OR e.weights_tag <> $weights_tag
      OR list_contains($missing_shards::VARCHAR[], e.shard)
      OR coalesce(e.revision, 0) <> $revision
  )
ORDER BY i.item_id
