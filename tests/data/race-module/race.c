// SPDX-License-Identifier: GPL-2.0
/*
 * A real race for deja's Linux test (issue #11): a timer callback and a /proc write handler
 * both increment `race_counter` with an unlocked read-modify-write. The handler's window
 * (a read, a short delay, a write) lets the timer's increment land in between, and the
 * handler's write then loses it. The handler checks the invariant after its own update
 * and hits a WARN when an update was lost, which `deja record --fail-on WARNING:` catches;
 * `deja replay --watch-virtual` at the address printed at load names the store that lost it.
 */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/timer.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("An unlocked read-modify-write raced by a timer, for deja's tests");

unsigned long race_counter;
static unsigned long race_ticks, race_writes;
static struct timer_list race_timer;

static void race_tick(struct timer_list *unused)
{
	race_counter++;
	race_ticks++;
	mod_timer(&race_timer, jiffies + 1);
}

static ssize_t race_write(struct file *file, const char __user *buf, size_t len, loff_t *pos)
{
	unsigned long seen = READ_ONCE(race_counter);

	udelay(100);
	WRITE_ONCE(race_counter, seen + 1);
	race_writes++;
	WARN_ONCE(READ_ONCE(race_counter) != race_ticks + race_writes,
	     "race: lost update: counter %lu, ticks %lu + writes %lu\n",
	     READ_ONCE(race_counter), race_ticks, race_writes);
	return len;
}

static const struct proc_ops race_ops = {
	.proc_write = race_write,
};

static int __init race_init(void)
{
	if (!proc_create("race", 0200, NULL, &race_ops))
		return -ENOMEM;
	timer_setup(&race_timer, race_tick, 0);
	mod_timer(&race_timer, jiffies + 1);
	pr_info("race: race_counter at %px\n", &race_counter);
	return 0;
}

static void __exit race_exit(void)
{
	del_timer_sync(&race_timer);
	remove_proc_entry("race", NULL);
}

module_init(race_init);
module_exit(race_exit);
