-- Drop index rows of backbone $1 that no longer count: other weights than $2, or the item's image is gone or not ok.
DELETE FROM embedding_index e
WHERE e.backbone = $1
  AND (
      e.weights_tag <> $2
      OR NOT EXISTS (
          SELECT 1 FROM item_images i WHERE i.item_id = e.item_id AND i.status = 'ok'
      )
  )
