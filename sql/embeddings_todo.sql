-- Images that need features for backbone $1 under weights tag $2: new, changed (content hash differs),
-- computed with other weights, or whose shard file is gone ($3: list of missing shards), or computed
-- before the backbone's current feature revision $4 (a fix that changed what its features hold).
SELECT i.item_id, i.content_hash, i.path
FROM item_images i
LEFT JOIN embedding_index e ON e.backbone = $1 AND e.item_id = i.item_id
WHERE i.status = 'ok'
  AND (
      e.item_id IS NULL
      OR e.content_hash IS DISTINCT FROM i.content_hash
      OR e.weights_tag <> $2
      OR list_contains($3::VARCHAR[], e.shard)
      OR coalesce(e.revision, 0) <> $4
  )
ORDER BY i.item_id
