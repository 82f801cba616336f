-- Drop index rows of $backbone that no longer count: other weights than $weights_tag, or the item's image is
-- gone or not ok (rows brought with the dataset, content hash 'byo:...', need no image).
DELETE FROM embedding_index e
WHERE e.backbone = $backbone
  AND (
      e.weights_tag <> $weights_tag
      OR (
          NOT starts_with(e.content_hash, 'byo:')
          AND NOT EXISTS (SELECT 1 FROM item_images i WHERE i.item_id = e.item_id AND i.status = 'ok')
      )
  )
