"""The scheduler service: durable timers fired in due_at order by the database clock."""
